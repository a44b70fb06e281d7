"""Serving: TF-Hub-style SavedModel export (`export`), prediction (`predict`) and `SavedModelLayer`."""
