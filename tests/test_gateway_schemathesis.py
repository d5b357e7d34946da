"""schemathesis (4.x) against the gateway's own OpenAPI schema: every generated request, valid or not, gets an
answer below 500. Runs the schemathesis CLI against a real gateway on the real bus and S3 (no workers: requests
that would need one just stay pending)."""

from __future__ import annotations

import asyncio
import os
import re
import sys
from pathlib import Path

from gateway_support import running_gateway

from bus_gateway.config import GatewayConfig

pytest_plugins = ["gateway_support"]

FUZZ = GatewayConfig(long_poll_s=0.2, unknown_request_grace_s=0.1, sync_sample_timeout_s=0.2,
                     max_body_bytes=1 << 20)


async def test_openapi_fuzzing_finds_no_server_errors(gw_settings, tmp_path: Path):
    async with running_gateway(gw_settings, None, FUZZ) as url:
        cli = Path(sys.executable).with_name("schemathesis")
        proc = await asyncio.create_subprocess_exec(
            str(cli), "run", f"{url}/schema/openapi.json", "--checks", "not_a_server_error",
            "--header", "X-API-Key: tml-fuzz", "--max-examples", "20", "--workers", "1", "--seed", "1",
            "--phases", "examples,coverage,fuzzing", "--generation-database", "none", "--request-timeout", "30",
            "--no-color", "--report", "junit", "--report-dir", str(tmp_path),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, cwd=tmp_path,
            env={**os.environ, "SCHEMATHESIS_HOOKS": ""})
        output, _ = await proc.communicate()
    text = output.decode(errors="replace")
    assert proc.returncode == 0, text[-8000:]
    selected = re.search(r"Selected: (\d+)/(\d+)", text)
    assert selected and selected.group(1) == selected.group(2) and int(selected.group(1)) >= 35, text[-3000:]
    assert re.search(r"Tested: (\d+)", text).group(1) == selected.group(1)
