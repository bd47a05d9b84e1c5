#!/usr/bin/env python3
"""An example GRS provisioner plugin, in Python.

It implements the whole `grs.provisioner.v1.Provisioner` protocol
(docs/provisioner-plugins.md) over a toy hypervisor: a directory in which
every VM is one JSON file, `<name>.json`. A file GRS made carries the
ownership marker (installation and pool); any other file is a "foreign VM"
the plugin must never touch. Copy it to start a real backend: replace the
file operations with your hypervisor's API calls.

Run by GRS (it sets GRS_PLUGIN_SOCKET and reads the handshake line):

    [pools.linux.provisioner]
    type = "plugin"
    command = ["python3", "examples/python-provisioner/plugin.py",
               "--state-dir", "/var/lib/grs-example"]
    capacity = 4        # this plugin's pool document: at most 4 VMs

By hand: `plugin.py --state-dir DIR --listen unix:/tmp/p.sock`.

The stubs come from the .proto at run time: from PYTHONPATH when they are
there, else generated at start-up from ../../proto with grpc_tools.
"""

import argparse
import json
import logging
import os
import re
import sys
import threading
import time
import uuid
from concurrent import futures

import grpc

HERE = os.path.dirname(os.path.abspath(__file__))
PROTO_DIR = os.path.join(HERE, "..", "..", "proto")


def import_stubs():
    """The generated stubs: from PYTHONPATH if they are there, else made now
    from proto/ with grpc_tools (into a temporary directory: generated code
    is never committed)."""
    try:
        from grs.provisioner.v1 import provisioner_pb2, provisioner_pb2_grpc
        return provisioner_pb2, provisioner_pb2_grpc
    except ImportError:
        pass
    import tempfile
    from grpc_tools import protoc
    import importlib.resources as resources
    out = tempfile.mkdtemp(prefix="grs-example-stubs-")
    well_known = str(resources.files("grpc_tools") / "_proto")
    rc = protoc.main(["grpc_tools.protoc", f"-I{PROTO_DIR}", f"-I{well_known}",
                      f"--python_out={out}", f"--grpc_python_out={out}",
                      "grs/provisioner/v1/provisioner.proto"])
    if rc != 0:
        sys.exit(f"cannot generate the stubs from {PROTO_DIR} (grpc_tools.protoc exit {rc})")
    sys.path.insert(0, out)
    from grs.provisioner.v1 import provisioner_pb2, provisioner_pb2_grpc
    return provisioner_pb2, provisioner_pb2_grpc


pb, rpc = import_stubs()

PROTOCOL_VERSION = 1
VERSION = "0.1.0"
# A DNS label: what GRS instance names are, and all a plugin may accept.
NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
# The pool document's keys and their defaults.
POOL_DEFAULTS = {"capacity": None, "boot_seconds": 0.0}

log = logging.getLogger("example-plugin")


class Abort(Exception):
    """A gRPC error: the status code says what GRS should do (see the docs)."""

    def __init__(self, code, message):
        super().__init__(message)
        self.code = code
        self.message = message


class Backend(rpc.ProvisionerServicer):
    def __init__(self, state_dir, installation):
        self.dir = state_dir
        self.installation = installation
        self.pools = {}  # pool name -> its document (with defaults)
        self.lock = threading.Lock()  # one VM operation at a time
        os.makedirs(self.dir, exist_ok=True)

    # -- the toy hypervisor: one JSON file per VM -------------------------

    def _path(self, name):
        return os.path.join(self.dir, name + ".json")

    def _read(self, name):
        try:
            with open(self._path(name)) as f:
                return json.load(f)
        except FileNotFoundError:
            return None
        except (ValueError, OSError):
            return {}  # unreadable: not ours, whatever it is

    def _write(self, name, vm):
        tmp = self._path(name) + ".tmp"
        with open(tmp, "w") as f:
            json.dump(vm, f)
        os.replace(tmp, self._path(name))

    def _all(self):
        for entry in sorted(os.listdir(self.dir)):
            if entry.endswith(".json"):
                name = entry[: -len(".json")]
                vm = self._read(name)
                if vm is not None:
                    yield name, vm

    def _ours(self, vm, pool):
        marker = vm.get("marker") or {}
        return marker.get("installation") == self.installation and marker.get("pool") == pool

    def _owned(self, pool, name):
        """The VM `name` of `pool`, None if absent; PERMISSION_DENIED if the
        name is taken by a VM that is not this pool's."""
        vm = self._read(name)
        if vm is None:
            return None
        if not self._ours(vm, pool):
            raise Abort(grpc.StatusCode.PERMISSION_DENIED,
                        f"VM {name} exists but is not owned by pool {pool} of this GRS installation")
        return vm

    def _instance(self, name, vm):
        marker = vm["marker"]
        inst = pb.Instance(
            name=name,
            provider_id=vm["id"],
            pool=marker["pool"],
            job_id=marker["job_id"],
            state=pb.InstanceState.Value("INSTANCE_STATE_" + vm["state"].upper()),
            location="toy",
        )
        inst.created_at.FromNanoseconds(int(marker["created"] * 1e9))
        return inst

    # -- the protocol -------------------------------------------------------

    def Handshake(self, request, context):
        if request.protocol_version != PROTOCOL_VERSION:
            raise Abort(grpc.StatusCode.FAILED_PRECONDITION,
                        f"this plugin speaks protocol version {PROTOCOL_VERSION}, "
                        f"GRS asked for {request.protocol_version}")
        return pb.HandshakeResponse(
            protocol_version=PROTOCOL_VERSION, backend="python-example", version=VERSION,
            capabilities=pb.Capabilities(start_stop=True))

    def ValidatePool(self, request, context):
        key = f"pools.{request.pool}.provisioner"
        try:
            doc = json.loads(request.config_json)
        except ValueError as e:
            raise Abort(grpc.StatusCode.INVALID_ARGUMENT, f"{key}: not JSON: {e}")
        if not isinstance(doc, dict):
            raise Abort(grpc.StatusCode.INVALID_ARGUMENT, f"{key}: must be a table")
        unknown = sorted(set(doc) - set(POOL_DEFAULTS))
        if unknown:
            raise Abort(grpc.StatusCode.FAILED_PRECONDITION,
                        f"{key}: unknown key {unknown[0]!r} (known: {', '.join(POOL_DEFAULTS)})")
        cap = doc.get("capacity")
        if cap is not None and (not isinstance(cap, int) or isinstance(cap, bool) or cap < 1):
            raise Abort(grpc.StatusCode.FAILED_PRECONDITION,
                        f"{key}.capacity: must be a whole number of at least 1, not {cap!r}")
        boot = doc.get("boot_seconds", 0.0)
        if not isinstance(boot, (int, float)) or isinstance(boot, bool) or boot < 0:
            raise Abort(grpc.StatusCode.FAILED_PRECONDITION,
                        f"{key}.boot_seconds: must be a number of seconds, not {boot!r}")
        self.pools[request.pool] = {**POOL_DEFAULTS, **doc}
        # A real backend checks the pool against the hypervisor here
        # (template exists, credentials work): FAILED_PRECONDITION if not.
        if not os.access(self.dir, os.W_OK):
            raise Abort(grpc.StatusCode.FAILED_PRECONDITION, f"{key}: cannot write {self.dir}")
        log.info("pool %s configured: %s", request.pool, self.pools[request.pool])
        # The toy hypervisor boots nothing: any bootstrap will do. A real
        # backend says what its pool's VMs take (its document may choose).
        return pb.ValidatePoolResponse(bootstrap=pb.BOOTSTRAP_KIND_CLOUD_INIT)

    def Create(self, request, context):
        pool, name = request.pool, request.name
        if not NAME_RE.match(name):
            raise Abort(grpc.StatusCode.INVALID_ARGUMENT,
                        f"instance name {name!r} is not a DNS label")
        cfg = self.pools.get(pool)
        if cfg is None:
            # GRS answers NOT_FOUND by sending the pool's document again.
            raise Abort(grpc.StatusCode.NOT_FOUND, f"pool {pool} is not configured in this plugin")
        with self.lock:
            vm = self._owned(pool, name)
            if vm is not None:
                return pb.CreateResponse(instance=self._instance(name, vm))  # idempotent
            live = sum(1 for _, v in self._all() if self._ours(v, pool))
            if cfg["capacity"] is not None and live >= cfg["capacity"]:
                raise Abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                            f"pool {pool} holds {live} of {cfg['capacity']} VMs")
            # The marker goes on at once, so a create interrupted below
            # leaves a VM that List and Delete still find.
            vm = {
                "id": "toy/" + uuid.uuid4().hex[:12],
                "state": "creating",
                "marker": {"installation": self.installation, "pool": pool,
                           "job_id": request.job_id, "created": time.time()},
            }
            self._write(name, vm)
        # Booting; the seed URL / runner config is a secret: never log it.
        kind = request.bootstrap.WhichOneof("kind") or "none"
        log.info("creating %s in pool %s (bootstrap: %s)", name, pool, kind)
        time.sleep(cfg["boot_seconds"])
        with self.lock:
            vm = self._read(name)
            if vm is None:
                raise Abort(grpc.StatusCode.UNAVAILABLE, f"instance {name} vanished while starting")
            vm["state"] = "running"
            self._write(name, vm)
        return pb.CreateResponse(instance=self._instance(name, vm))

    def Delete(self, request, context):
        with self.lock:
            if self._owned(request.pool, request.name) is not None:
                os.remove(self._path(request.name))
                log.info("deleted %s", request.name)
        return pb.DeleteResponse()  # absent is success

    def Get(self, request, context):
        vm = self._read(request.name)
        if vm is None or not self._ours(vm, request.pool):
            return pb.GetResponse(found=False)
        return pb.GetResponse(found=True, instance=self._instance(request.name, vm))

    def List(self, request, context):
        # Works for any pool, configured or not (pools removed from GRS's
        # configuration are cleaned up through List/Delete/RemoveAll).
        return pb.ListResponse(instances=[
            self._instance(n, vm) for n, vm in self._all() if self._ours(vm, request.pool)])

    def _set_state(self, request, state):
        with self.lock:
            vm = self._owned(request.pool, request.name)
            if vm is None:
                raise Abort(grpc.StatusCode.INTERNAL, f"instance {request.name} does not exist")
            vm["state"] = state
            self._write(request.name, vm)

    def Start(self, request, context):
        self._set_state(request, "running")
        return pb.StartResponse()

    def Stop(self, request, context):
        self._set_state(request, "stopped")
        return pb.StopResponse()

    def RemoveAll(self, request, context):
        removed = []
        with self.lock:
            for name, vm in list(self._all()):
                if self._ours(vm, request.pool):
                    os.remove(self._path(name))
                    removed.append(name)
        log.info("removed every instance of pool %s: %s", request.pool, removed)
        return pb.RemoveAllResponse(removed=removed)


def with_status_codes(servicer):
    """Wraps each RPC so that Abort becomes its status code and any other
    exception INTERNAL (a permanent error) with its message."""

    class Wrapped(rpc.ProvisionerServicer):
        pass

    for method in ["Handshake", "ValidatePool", "Create", "Delete", "Get", "List",
                   "Start", "Stop", "RemoveAll"]:
        inner = getattr(servicer, method)

        def call(self, request, context, inner=inner, method=method):
            try:
                return inner(request, context)
            except Abort as e:
                context.abort(e.code, e.message)
            except Exception as e:  # noqa: BLE001 - reported to GRS, not swallowed
                log.exception("%s failed", method)
                context.abort(grpc.StatusCode.INTERNAL, f"{method}: {e}")

        setattr(Wrapped, method, call)
    return Wrapped()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--state-dir", required=True, help="where the toy hypervisor keeps its VMs")
    p.add_argument("--installation", default="grs",
                   help="the GRS installation id written in every VM's marker")
    p.add_argument("--listen", help="unix:/PATH or HOST:PORT (default: $GRS_PLUGIN_SOCKET)")
    args = p.parse_args()
    logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")

    from_grs = "GRS_PLUGIN_SOCKET" in os.environ
    listen = args.listen or (f"unix:{os.environ['GRS_PLUGIN_SOCKET']}" if from_grs else None)
    if listen is None:
        p.error("this is a GRS provisioner plugin: give --listen, or let GRS start it")
    if listen.startswith("unix:"):
        path = listen[len("unix:"):]
        if os.path.exists(path):
            os.remove(path)
        network, address = "unix", path
    else:
        network, address = "tcp", listen

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    rpc.add_ProvisionerServicer_to_server(
        with_status_codes(Backend(args.state_dir, args.installation)), server)
    port = server.add_insecure_port(listen if network == "unix" else address)
    if network == "tcp":
        address = f"{address.rsplit(':', 1)[0]}:{port}"
    server.start()
    # The handshake line: GRS connects to what it says.
    print(f"grs-plugin|{PROTOCOL_VERSION}|{network}|{address}", flush=True)

    done = threading.Event()
    if from_grs:
        # GRS closes our stdin to stop us (and a dead GRS closes it too).
        threading.Thread(target=lambda: (sys.stdin.read(), done.set()), daemon=True).start()
    import signal
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    done.wait()
    server.stop(grace=5).wait()
    log.info("stopped")


if __name__ == "__main__":
    main()
