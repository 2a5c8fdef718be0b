"""The SlapOS side: the node as slapgrid leaves it on disk (``node``)."""
