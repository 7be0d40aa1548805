"""Ray plumbing shared by the batch jobs (`pipelines/`) and the service (`serving/`): starting or joining Ray, the one stop path, local multi-node clusters."""
