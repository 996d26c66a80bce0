"""Device and precision choice."""
