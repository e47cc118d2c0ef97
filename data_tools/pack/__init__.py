"""`hyena-glt pack`: FASTA files -> webdataset tar shards + manifest, for one job.

One job = one process (an MPI rank, a SLURM array task, or the only one) and its
`--workers`. A file is packed in one pass (`FilePass`): a single decompression checks it
and yields its records (`fasta.FastaReader`), each window's fate and place are planned,
and the samples go into the shards' temporary files. Shards are cut in source order over
all the job's files, so planning a file starts from the shards as the file before it
left them (a `Handover`). Planning is cheap; reading and writing are the work. So with
several workers each takes whole files: it reads (and checks) its file while the files
before it are still being read, plans as soon as their handover comes (even in the middle
of writing another file), passes its own handover on, and writes, while the next worker
already plans. What goes where never depends on the workers, so neither do the output
bytes.

No shard holding any of a file's windows is renamed into place (or recorded) before the
whole file passed its check. A file that fails it under --skip-bad-files is left out: if
nothing of it was planned yet (it failed while read ahead), the plan goes on without it;
otherwise the job plans again from the start without it, keeping what it completed
before, as on resume.

Resume: every finished shard leaves a completion record in the job's completion log
(written after the shard and its index were renamed into place). A restarted job hashes its input files, plans everything
again and does not write a shard whose record names inputs with the same sha256 and whose
files still hash to it; once planned, such a shard must have the record's samples, bases,
size, first and last sample and inputs, else the job starts over without resuming.

The modules, by job:

    options.py        PackOptions: checked, what of them defines the output, the options file in --out
    file_pass.py      one file read, planned and written (FilePass); the Handover between files
    books.py          the job's books (JobBooks): plans in file order, shard contributors, completion records
    shared_hashes.py  the sha256 of a shard several workers write, hashed as its parts land
    workers.py        the --workers processes and the job's side of them
    lock.py           one run per job (DIR/.pack/LOCK-job-NNNNN); the start: options checked, manifests
                      removed, leftovers of killed runs cleared, under the pack's state lock
    job.py            one job start to end: inputs, packing (inline or with workers), resume, manifests

Nothing here imports torch (the alphabet comes from hyena_glt.alphabet, which loads none), so
a pack's workers fork cheaply.
"""

from .job import JobResult, pack_job, run_pack
from .options import PackOptions

__all__ = ["JobResult", "PackOptions", "pack_job", "run_pack"]
