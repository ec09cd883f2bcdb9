"""The six channels of targets, outputs and weights, in DECODE's order, with their physical units.

Physical units: p a probability, phot photons, x and y px of the input frame (x = first image axis,
the row), z nm, bg photons / px. Network units are converted in one place,
:class:`decode_var.data.targets.TargetRescale`.
"""
CHANNELS = ("p", "phot", "x", "y", "z", "bg")
