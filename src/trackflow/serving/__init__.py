"""Using a registered model: rows in, the REST service that follows an alias, batch scoring."""
