"""Compatibility shim for tools and clusters that still call ``python setup.py``.

``pyproject.toml`` is the single source of truth (name, version, dependencies, extras, entry points);
this file only hands over to setuptools, which reads it from there.
"""

from setuptools import setup

setup()
