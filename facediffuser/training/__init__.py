"""Training the TDM and SDM as plain torch (METHOD.md §3), no Ray: `pipelines/train.py` runs it on Ray Train."""
