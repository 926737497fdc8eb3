"""The networked transport: a versioned protobuf schema over gRPC with mutual TLS.

``server.GrpcServerTransport`` implements the Transport protocol for the coordinator;
``client.Participant`` is the loop a participant runs around its ClientWorker. Importing this package
needs grpcio and protobuf; nothing else in fedtune imports it.
"""
