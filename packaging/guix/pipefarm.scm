;;; pipefarm for GNU Guix:
;;;   guix package --install-from-file=packaging/guix/pipefarm.scm
;;; Its propagated inputs follow pyproject.toml's dependencies (tests/packaging/ checks them
;;; with guile). Not build-verified in CI: Guix is not installable there.
(use-modules (guix packages)
             (guix download)
             (guix build-system pyproject)
             (guix build-system python)
             ((guix licenses) #:prefix license:)
             (gnu packages databases)
             (gnu packages python-build)
             (gnu packages python-xyz))

(define-public python-pipefarm
  (package
    (name "python-pipefarm")
    (version "0.1.0")
    (source
     (origin
       (method url-fetch)
       (uri (pypi-uri "pipefarm" version))
       (sha256
        (base32 "0ibdzw1ml8capw0l87783kanway6rf0i6lqp5ac4fy20jy7bl58c"))))
    (build-system pyproject-build-system)
    ;; the test suite needs real schedulers, MPI and a browser: it runs in the project's CI
    (arguments (list #:tests? #f))
    (native-inputs (list python-setuptools python-wheel))
    (propagated-inputs
     (list python-click
           python-cloudpickle
           python-msgspec
           python-psutil
           python-pyarrow
           python-rich))
    (home-page "HOMEPAGE")
    (synopsis "Run large numbers of tasks in parallel and never lose a result")
    (description
     "pipefarm runs large numbers of tasks (Python functions and shell commands) in
parallel, from a laptop to an HPC cluster, and keeps every finished result on disk: a run
interrupted by a crash or a walltime resumes what is left.")
    (license license:bsd-3)))

python-pipefarm
