#!/usr/bin/python3
"""The real cloud-init as an oracle for GRS's NoCloud bootstrap.

Run with the interpreter cloud-init is installed for (Debian's
/usr/bin/python3 and the `cloud-init` package: 22.4 on Debian 12). Driven by
tests/tests/cloud_init_real.rs; prints one JSON object on stdout.

    cloud_init_oracle.py SMBIOS1 EXPECTED_SEED_PREFIX EXPECTED_INSTANCE_ID

SMBIOS1 is the VM's `smbios1` option as GRS set it through the PVE API
(`uuid=...,serial=<base64>,base64=1`). With `base64=1`, PVE decodes the
serial before handing it to QEMU (qemu-server PVE/QemuServer.pm, smbios1
handling), so the guest's SMBIOS system serial (what cloud-init reads as
`system-serial-number`) is the decoded text.

What runs is cloud-init's own code, not a re-implementation:
1. `DataSourceNoCloudNet._get_data()` (cloudinit/sources/DataSourceNoCloud.py),
   the network-stage NoCloud datasource, with only the machine-specific
   inputs replaced: the DMI serial is the VM's, the kernel command line is
   empty, there are no seed directories or labelled disks. It parses the
   serial with `load_cmdline_data`/`parse_cmdline_data` and fetches
   meta-data, user-data and vendor-data from the seed with
   `util.read_seeded` (cloudinit/url_helper.py underneath), through the
   running gateway.
2. The check `cloud-init init` (network stage) makes next, in
   cloudinit/cmd/main.py `main_init`: a datasource whose dsmode is not
   `net` makes the stage exit ("[net] Exiting. datasource ... in local
   mode") without applying the user-data.
3. The user-data is split by cloud-init's `UserDataProcessor` (must be one
   text/cloud-config part) and validated with `cloud-init schema
   --config-file` (the installed CLI).

Exit status 0 when every check passes, 1 otherwise (the JSON says which);
2 when cloud-init cannot be imported.
"""

import base64
import json
import os
import subprocess
import sys
import tempfile
from unittest import mock


def main():
    smbios1, seed_prefix, instance_id = sys.argv[1:4]
    out = {"checks": {}, "ok": False}
    try:
        import cloudinit.version
        from cloudinit import dmi, helpers, sources, util
        from cloudinit.sources import DataSourceNoCloud as nocloud
        from cloudinit.user_data import UserDataProcessor
    except ImportError as e:
        print(json.dumps({"error": f"cannot import cloud-init: {e}"}))
        return 2
    out["cloud_init_version"] = cloudinit.version.version_string()

    fields = dict(
        kv.split("=", 1) for kv in smbios1.split(",") if "=" in kv
    )
    if fields.get("base64") != "1" or "serial" not in fields:
        out["error"] = "smbios1 has no base64 serial"
        print(json.dumps(out))
        return 1
    serial = base64.b64decode(fields["serial"]).decode()
    # What precedes the seed URL (the URL embeds the bootstrap token).
    out["serial_prefix"] = serial.split(";s=", 1)[0]

    def fake_dmi(key):
        return serial if key == "system-serial-number" else None

    checks = out["checks"]
    with tempfile.TemporaryDirectory() as tmp, mock.patch.object(
        dmi, "read_dmi_data", side_effect=fake_dmi
    ), mock.patch.object(util, "get_cmdline", return_value=""), mock.patch.object(
        util, "find_devs_with", return_value=[]
    ):
        paths = helpers.Paths({"cloud_dir": tmp, "run_dir": tmp})
        # The local stage: NoCloud without network. An http seed is not for
        # it (supported_seed_starts), so it must not claim the instance.
        local = nocloud.DataSourceNoCloud({}, None, paths)
        checks["local_stage_declines_http_seed"] = local._get_data() is False

        # The network stage: parse the serial, fetch the seed.
        ds = nocloud.DataSourceNoCloudNet({}, None, paths)
        try:
            claimed = ds._get_data()
        except Exception as e:  # read_seeded raises on a failed fetch
            out["error"] = f"the NoCloud datasource failed: {type(e).__name__}: {e}"
            print(json.dumps(out))
            return 1
        md = ds.metadata or {}
        out["dsmode"] = ds.dsmode
        out["seedfrom"] = md.get("seedfrom")
        out["instance_id"] = md.get("instance-id")
        checks["datasource_claims_instance"] = bool(claimed)
        # cloud-init's main_init: mode net and dsmode != net -> exit.
        checks["network_stage_proceeds"] = ds.dsmode == sources.DSMODE_NETWORK
        checks["seed_is_gateway"] = str(md.get("seedfrom", "")).startswith(
            seed_prefix
        )
        checks["meta_data_fetched"] = md.get("instance-id") == instance_id
        ud = ds.userdata_raw
        if isinstance(ud, str):
            ud = ud.encode()
        checks["user_data_fetched"] = bool(ud)

        if ud:
            parts = [
                p.get_content_type()
                for p in UserDataProcessor(paths).process(ud).walk()
                if not p.is_multipart()
            ]
            out["user_data_parts"] = parts
            checks["user_data_is_cloud_config"] = parts == ["text/cloud-config"]
            path = os.path.join(tmp, "user-data")
            with open(path, "wb") as f:
                f.write(ud)
            schema = subprocess.run(
                ["cloud-init", "schema", "--config-file", path],
                capture_output=True,
                text=True,
            )
            out["schema"] = {
                "returncode": schema.returncode,
                "stdout": schema.stdout.strip(),
                # cloud-init's messages, never the document (a secret).
                "stderr": schema.stderr.strip()[-2000:],
            }
            checks["user_data_schema_valid"] = schema.returncode == 0

    out["ok"] = all(checks.values()) and len(checks) == 8
    print(json.dumps(out))
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
