"""On-disk formats: one module per format, lazy readers and atomic writers."""
