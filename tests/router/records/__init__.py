"""Tests of router.records."""
