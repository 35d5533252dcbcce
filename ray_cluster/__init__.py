"""splitserve.ray_cluster: a splitserve cluster on Ray (`splitserve ray up|scale|status|down`).

Every prefill and decode node, the router and (unless --redis is given) Redis run as Ray
actors, each owning its server as a child process; a detached, named controller actor keeps
the cluster's state so that `scale`, `status` and `down` from any process find it.
docs/deploy.md describes the deployment.

Ray is an optional dependency (the `ray` extra): only the modules of this package import
it, and nothing outside the package imports them at module level.
"""
