"""The Ray Serve render application and its gRPC definitions (``render.proto``).

``serve.app`` (the Ingress deployment, ``build_app``), ``serve.renderer`` (the Renderer deployment),
``serve.http_api`` and ``serve.grpc_api`` (the front-ends), ``serve.api`` (settings, validation,
errors and the in-memory registry catalog; no Ray), ``serve.grpc_servicer`` (registers the service
on Serve's gRPC proxy without importing torch).
"""
