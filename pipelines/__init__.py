"""The batch jobs on Ray (preprocess, train, evaluate, demo): each a CLI over the library in facediffuser/."""
