"""Fixtures for the browser tests: the same pushletd fixture as tests/integration."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "integration"))

from pushlet_fixtures import *  # noqa: E402,F401,F403
