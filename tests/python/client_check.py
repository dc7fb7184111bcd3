"""A client generated from proto/ by another gRPC stack (Python grpcio) against a running,
secured dispatcher cluster: it connects over TLS trusting the cluster's CA and sends the
bearer token as call credentials, submits a job, lists it, checks the standard health
service, and discovers the services through server reflection, as grpcurl would. It also
checks that a call without a token, or with a token nobody issued, is UNAUTHENTICATED.

Usage: client_check.py PROTO_ROOT ENDPOINT CA_FILE TOKEN_FILE

ENDPOINT must be a name the replica's certificate carries (127.0.0.1:PORT or
localhost:PORT for `dispatchctl dev-certs` certificates).
"""

import sys
import tempfile
import uuid

from grpc_tools import protoc


def main() -> int:
    if len(sys.argv) != 5:
        print(__doc__, file=sys.stderr)
        return 2
    proto_root, endpoint, ca_file, token_file = sys.argv[1:5]
    out = tempfile.mkdtemp()
    rc = protoc.main([
        "protoc", f"-I{proto_root}", f"--python_out={out}", f"--grpc_python_out={out}",
        "dispatcher/v1/dispatcher.proto",
    ])
    if rc != 0:
        print("protoc failed", file=sys.stderr)
        return 1
    sys.path.insert(0, out)
    import grpc
    from dispatcher.v1 import dispatcher_pb2 as pb
    from dispatcher.v1 import dispatcher_pb2_grpc as rpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    with open(ca_file, "rb") as f:
        ca = f.read()
    with open(token_file, encoding="ascii") as f:
        token = f.read().strip()
    tls = grpc.ssl_channel_credentials(root_certificates=ca)
    # grpc's own way to send `authorization: Bearer <token>` on every call of a channel.
    channel = grpc.secure_channel(
        endpoint, grpc.composite_channel_credentials(tls, grpc.access_token_call_credentials(token)))
    jobs = rpc.JobServiceStub(channel)
    job_id = str(uuid.uuid4())
    spec = pb.JobSpec(
        name="from-python",
        vertices=[pb.Vertex(name="v", parallelism=1, task=pb.Task(sleep=pb.SleepTask(duration_ms=1000)))],
    )
    resp = jobs.SubmitJob(pb.SubmitJobRequest(job_id=job_id, spec=spec), timeout=20)
    assert resp.job_id == job_id and resp.created, resp
    again = jobs.SubmitJob(pb.SubmitJobRequest(job_id=job_id, spec=spec), timeout=20)
    assert not again.created, "a retried submission is the same job"
    listed = jobs.ListJobs(pb.ListJobsRequest(), timeout=20)
    assert [j.job_id for j in listed.jobs if j.name == "from-python"] == [job_id], listed
    try:
        jobs.SubmitJob(pb.SubmitJobRequest(job_id="nope", spec=spec), timeout=20)
        raise AssertionError("an invalid id was accepted")
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "job_id" in e.details(), e

    # The same TLS channel without a token, and with a token nobody issued (sent as plain
    # metadata, the way a client without call credentials would): refused.
    bare = grpc.secure_channel(endpoint, tls)
    bare_jobs = rpc.JobServiceStub(bare)
    refusals = [
        ("no token", lambda: bare_jobs.ListJobs(pb.ListJobsRequest(), timeout=20)),
        ("no token", lambda: bare_jobs.SubmitJob(pb.SubmitJobRequest(job_id=str(uuid.uuid4()), spec=spec), timeout=20)),
        ("unknown token", lambda: bare_jobs.ListJobs(
            pb.ListJobsRequest(), timeout=20, metadata=[("authorization", "Bearer " + "0" * 64)])),
    ]
    for why, call in refusals:
        try:
            call()
            raise AssertionError(f"a call with {why} was accepted")
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.UNAUTHENTICATED, (why, e.code(), e.details())
    still = jobs.ListJobs(pb.ListJobsRequest(), timeout=20)
    assert [j.job_id for j in still.jobs if j.name == "from-python"] == [job_id], \
        "refused calls changed nothing"

    # Health and reflection answer without a token (load balancers and grpcurl use them).
    health = health_pb2_grpc.HealthStub(bare)
    for service in ["", "dispatcher.v1.JobService"]:
        status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status
        assert status == health_pb2.HealthCheckResponse.SERVING, (service, status)

    db = ProtoReflectionDescriptorDatabase(bare)
    services = set(db.get_services())
    for s in ["dispatcher.v1.JobService", "dispatcher.v1.ClusterService", "dispatcher.v1.TaskManagerService", "grpc.health.v1.Health"]:
        assert s in services, (s, services)
    method = db.FindFileContainingSymbol("dispatcher.v1.JobService")
    assert method.name == "dispatcher/v1/dispatcher.proto", method.name
    print(f"python client ok over TLS: submitted and listed {job_id}; calls without a valid token "
          f"UNAUTHENTICATED; health SERVING; reflection lists {len(services)} services")
    return 0


if __name__ == "__main__":
    sys.exit(main())
