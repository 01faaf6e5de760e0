"""Federation data: task and client specs, and the samples each client trains on."""
