"""Ray plumbing under both Ray layers (pipelines/, serving/): start or join Ray, the one stop path, local clusters."""
