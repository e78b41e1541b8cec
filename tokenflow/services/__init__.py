"""The services a cluster's pipeline talks to, run on one machine to rehearse a cluster setup and
for the tests: an S3 object store (SeaweedFS), PostgreSQL, and an MLflow tracking server with
basic auth, a PostgreSQL backend store and proxied S3 artifacts."""
