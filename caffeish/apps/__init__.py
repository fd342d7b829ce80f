"""Apps: the library side of each tool, plain functions callable from Python.

offsets (the DIGITS offset table, Crop checks and fixes), surgery and
surgery_fcn (classifier -> FCN, transplant, bilinear weights), surgery_files
(those operations written all or nothing), inference (classify and segment
images), classify and segment (folders of images into result rows and
pictures), dataset (DIGITS-style LMDB datasets), evaluate
(`caffe test` and segmentation scores), store, store_server and download (the
model store), progress (progress bars).  The command-line faces in
caffeish.tools call these.

Imports every stage before it; never caffeish.tools.
"""
