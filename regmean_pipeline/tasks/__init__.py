"""Task models around the merge: task folders, fine-tuning candidates, scoring them, tables and charts."""
