"""Tests of router.lookup."""
