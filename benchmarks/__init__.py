"""Benchmarks and load generators run by hand or in CI against the library, the batch jobs and the service."""
