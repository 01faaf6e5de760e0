"""Federation data: task and client specs, HDF5 federation files, and their builders."""


class DataError(ValueError):
    """A data file or data spec is missing, malformed, or does not match the config."""
