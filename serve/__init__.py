"""The Ray Serve render application (``serve.app``) and its gRPC definitions (``render.proto``)."""
