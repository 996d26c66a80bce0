"""Running the engine past one machine (Ray Serve)."""
