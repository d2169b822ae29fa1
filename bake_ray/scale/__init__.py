"""Ray, below the commands: starting or joining a cluster, Ray Train worker groups, what
the cluster can (auto)scale to, and whether it is ready for a search. Imports only the
core: it knows nothing of searches or MLflow."""
