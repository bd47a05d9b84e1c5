"""Starts fakepve for GRS's tests: an API token, two nodes, a template.

Prints one JSON line ({"url", "fingerprint", "token_id", "token_secret"})
once it listens, then serves until its standard input closes (the test
process ended or dropped it).

Usage: python3 fakepve_server.py [TIME_SCALE]

Environment: FAKEPVE_FAULTS (comma-separated KIND:TIMES: clone-lock,
template-locked), FAKEPVE_TEMPLATE_CONFIG (JSON object merged into the
template's config), FAKEPVE_VMS (JSON list of {vmid, name, config}).
"""

import asyncio
import hashlib
import json
import os
import secrets
import sys
import tempfile

from fakepve import FakePve, next_loopback
from fakepve.certs import make_cert

TOKEN_ID = 'root@pam!grs'


async def main():
    time_scale = float(sys.argv[1]) if len(sys.argv) > 1 else 0.02
    host = next_loopback()
    pve = FakePve(user='root@pam', password=secrets.token_hex(8), host=host, port=0)
    secret = secrets.token_hex(16)
    pve.apitokens[TOKEN_ID] = secret
    pve.add_node('pve2')
    pve.add_vm(9000, 'runner-template', node='pve1', template=True, config={
        'memory': '2048', 'cores': '2', 'agent': 'enabled=1',
        'net0': 'virtio=BC:24:11:00:00:01,bridge=vmbr0',
        'scsi0': 'local-lvm:base-9000-disk-0,size=8G', 'ostype': 'l26',
    })
    pve.time_scale = time_scale
    for fault in filter(None, os.environ.get('FAKEPVE_FAULTS', '').split(',')):
        kind, _, times = fault.partition(':')
        if kind == 'clone-lock':
            pve.fail('POST', '/clone', status=500,
                     message="can't lock file '/var/lock/qemu-server/lock-9000.conf' - got timeout",
                     times=int(times or 1))
        elif kind == 'template-locked':
            # fakepve's own catalogue entry: `VM is locked (backup)`.
            pve.fail('POST', '/clone', error='locked', times=int(times or 1))
    # Extra template options (JSON object), e.g. protection and tags, which
    # a clone inherits.
    template = next(vm for vm in pve.vms if vm.vmid == 9000)
    template.config.update(json.loads(os.environ.get('FAKEPVE_TEMPLATE_CONFIG') or '{}'))
    # Extra VMs (JSON list of {vmid, name, config}) on pve1.
    for vm in json.loads(os.environ.get('FAKEPVE_VMS') or '[]'):
        pve.add_vm(vm['vmid'], vm['name'], node='pve1', config=vm['config'])
    tmp = tempfile.mkdtemp(prefix='grs-fakepve-')
    certfile, keyfile, der = make_cert(tmp, hosts=(host,))
    await pve.start(certfile, keyfile)
    fingerprint = ':'.join('%02X' % b for b in hashlib.sha256(der).digest())
    print(json.dumps({'url': pve.url, 'fingerprint': fingerprint, 'token_id': TOKEN_ID,
                      'token_secret': secret}), flush=True)
    loop = asyncio.get_running_loop()
    # Serve until stdin closes.
    await loop.run_in_executor(None, sys.stdin.read)
    await pve.stop()


if __name__ == '__main__':
    asyncio.run(main())
