"""A client generated from proto/ by another gRPC stack (Python grpcio) against a running
dispatcher cluster: submits a job, lists it, checks the standard health service, and
discovers the services through server reflection, as grpcurl would.

Usage: client_check.py PROTO_ROOT ENDPOINT
"""

import sys
import tempfile
import uuid

from grpc_tools import protoc


def main() -> int:
    proto_root, endpoint = sys.argv[1], sys.argv[2]
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

    channel = grpc.insecure_channel(endpoint)
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

    health = health_pb2_grpc.HealthStub(channel)
    for service in ["", "dispatcher.v1.JobService"]:
        status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status
        assert status == health_pb2.HealthCheckResponse.SERVING, (service, status)

    db = ProtoReflectionDescriptorDatabase(channel)
    services = set(db.get_services())
    for s in ["dispatcher.v1.JobService", "dispatcher.v1.ClusterService", "dispatcher.v1.TaskManagerService", "grpc.health.v1.Health"]:
        assert s in services, (s, services)
    method = db.FindFileContainingSymbol("dispatcher.v1.JobService")
    assert method.name == "dispatcher/v1/dispatcher.proto", method.name
    print(f"python client ok: submitted and listed {job_id}; health SERVING; reflection lists {len(services)} services")
    return 0


if __name__ == "__main__":
    sys.exit(main())
