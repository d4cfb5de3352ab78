"""`python -m penaltyclient.ctl`: the same as the `penaltyctl` console script."""

from penaltyclient.ctl import main

main()
