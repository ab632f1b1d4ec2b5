"""Opening the repository for the daemon and the command line alike: where its key comes from
and is checked (key), and the storage stack the config asks for (stack). The only package that
knows both checkpointer's config and storage/.
"""
