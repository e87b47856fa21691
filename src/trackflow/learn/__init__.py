"""Learning: networks, Lightning training with transfer learning, evaluation, anomaly detectors."""
