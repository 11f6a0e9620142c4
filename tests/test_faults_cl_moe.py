"""CL-MoE's fault chain (see tests/test_faults.py): kills around the momentum merge and the Hub push.

Its own file, so that a second test worker runs it beside the LLaVA-CMoE chain.
"""

from __future__ import annotations

import pytest
from fault_chains import kill_and_resume_until_done

pytest_plugins = ["hub_server"]  # the `hub_server` fixture


pytestmark = pytest.mark.multiprocess  # many processes, each killed: the newest dependency set only in CI


def test_cl_moe_killed_at_every_phase_resumes_bit_identically(tmp_path, hub_server):
    """CL-MoE: kills around the momentum merge, the usage statistics, the save and the Hub push."""
    kill_and_resume_until_done("cl_moe", tmp_path, hub=hub_server)
