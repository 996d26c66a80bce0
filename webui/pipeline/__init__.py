"""A generation request and the stages that turn it into images."""
