"""Fixtures for the pushletd integration tests (see pushlet_fixtures.py)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from pushlet_fixtures import *  # noqa: E402,F401,F403
