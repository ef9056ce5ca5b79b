"""`python -m job`."""

from job.allocator import reexec_with_tcmalloc

reexec_with_tcmalloc()

from job.cli import main  # noqa: E402

main()
