"""The package version, in the lowest layer so that file writers can stamp it without importing the package
namespace (which would close an import cycle through the backend). ``setup.cfg`` repeats it."""
__version__ = "0.2.0"
