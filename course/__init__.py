"""Course assignments: student copies of the repository graded by its own tests (course/course.py)."""
