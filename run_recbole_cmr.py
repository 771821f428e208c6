"""Run a recbole_cmr or RecBole model on a multi-market dataset.

    python run_recbole_cmr.py --model=SASRec --dataset=xmrec-mini --train_mode=pooled
"""

from recbole_cmr.__main__ import main

if __name__ == "__main__":
    main()
