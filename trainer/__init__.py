import logging

# torch.fx warns once per process, at torchrec's import, about a tracing helper torchrec
# uses; it is not actionable for users of this package.
logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)
