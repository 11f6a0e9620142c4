"""Fault injection: a stream killed by SIGKILL at any moment of a task's life resumes bit-identically.

Each chain runs the three-task stream of ``scripts/continual_stream.py`` in a fresh process with
``--resume`` until it finishes, and the process is killed at the next moment of its fault list
each time (see ``scripts/fault_points.py`` and ``fault_chains.CHAINS``): several moments per phase,
many kills per stream, two in one task. The adapters (every expert, router, usage statistic and
locator) and the accuracy matrix it ends with must equal an uninterrupted run's exactly. One chain
per file (CL-MoE's, with its Hub pushes, is tests/test_faults_cl_moe.py), so that two test workers
run them side by side.
"""

from __future__ import annotations

import pytest
from fault_chains import kill_and_resume_until_done

pytestmark = pytest.mark.multiprocess  # many processes, each killed: the newest dependency set only in CI


def test_llava_cmoe_killed_at_every_phase_resumes_bit_identically(tmp_path):
    """LLaVA-CMoE: kills in the probe phase, training, a checkpoint's write, the locator, the save."""
    kill_and_resume_until_done("llava_cmoe", tmp_path)
