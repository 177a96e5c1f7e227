"""Tests of router.rules."""
