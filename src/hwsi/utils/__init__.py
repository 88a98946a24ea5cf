"""Small helpers shared by every stage (atomic files, job folders)."""
