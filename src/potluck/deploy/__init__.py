"""Deployment across real machines: gRPC server and client, wire format, TLS certificates.

Submodules are imported explicitly (``from potluck.deploy import certs``) so that importing
the package stays cheap: grpcio and cryptography load only when a deployment needs them.
"""
