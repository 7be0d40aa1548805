"""The online service on Ray Serve: the HTTP API, its deployments (encoder, sampler, job book) and the web page."""
