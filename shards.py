"""`python shards.py SRC OUT ...`: an ImageNet tree as shards (data/prepare.py, which documents the command; runs
read the shards through data/shards.py)."""
from data.prepare import main

if __name__ == "__main__":
    main()
