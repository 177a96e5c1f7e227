"""Tests of router.crm."""
