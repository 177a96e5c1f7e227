"""CRM connectors: look customers up, post call records, leads and tasks."""
