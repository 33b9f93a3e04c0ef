"""Evaluation metrics (docs/method.md, section 7): emotion recognition (recognition.py),
MEP-Bench-style utilization and faithfulness (perception.py), and reports (report.py)."""
